"""Gradio's queue is bounded (reliability checklist L2, with the per-user job cap in test_auth).

With ``queue_max_size=2`` and one event running (held inside its handler), two more wait and the
next is refused with HTTP 503 "Queue is full" at once; the accepted ones then all complete with
their own results. No crash, nothing lost of what was accepted.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")
pytest.importorskip("worker.submit")

from fastapi.testclient import TestClient  # noqa: E402
from test_auth import make_ctx  # noqa: E402

from app import forms  # noqa: E402
from app.handlers import Handlers  # noqa: E402
from app.main import create_app  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_a_full_queue_refuses_the_next_event_and_serves_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    served: list[str] = []

    def on_predict(self: Handlers, *values: Any) -> tuple[str, None]:  # held until released
        entered.set()
        assert release.wait(60), "never released"
        served.append(values[2])  # the budget field tells the events apart
        return f"predicted for {values[2]}", None

    monkeypatch.setattr(Handlers, "on_predict", on_predict)  # views bind it at build time
    ctx = make_ctx(tmp_path, None, queue_max_size=2)
    with TestClient(create_app(ctx)) as c:
        deps = c.get("/config").json()["dependencies"]
        dep = next(d for d in deps if d.get("api_name") == "on_predict")

        def join(i: int) -> Any:
            data = forms.FormValues(budget=f"{i}%").as_list()
            assert len(data) == len(dep["inputs"])
            body = {"data": data, "fn_index": dep["id"], "session_hash": f"tab-{i}",
                    "event_data": None, "trigger_id": dep["targets"][0][0]}  # fmt: skip
            return c.post("/gradio_api/queue/join", json=body)

        assert join(1).status_code == 200
        assert entered.wait(30)  # event 1 runs (the one slot of this listener) ...
        assert join(2).status_code == 200 and join(3).status_code == 200  # ... 2 and 3 wait
        full = join(4)
        assert full.status_code == 503 and "Queue is full" in full.text, full.text
        release.set()
        results = {}
        for i in (1, 2, 3):
            with c.stream("GET", f"/gradio_api/queue/data?session_hash=tab-{i}") as stream:
                for line in stream.iter_lines():
                    msg = json.loads(line[5:]) if line.startswith("data:") else {}
                    if msg.get("msg") == "process_completed":
                        assert msg["success"], msg
                        results[i] = msg["output"]["data"][0]
                        break
    assert results == {i: f"predicted for {i}%" for i in (1, 2, 3)}
    assert sorted(served) == ["1%", "2%", "3%"]  # the refused one never reached the handler
