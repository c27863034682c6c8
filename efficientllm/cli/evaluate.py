"""``eval``: held-out perplexity and zero-shot accuracy of any model folder, hub id or export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from efficientllm.cli.common import ModelOpt, friendly


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""

    @app.command("eval")
    @friendly
    def eval_cmd(
        model: ModelOpt,
        data: Annotated[
            list[Path], typer.Option("--data", "-d", help="Held-out text files or folders.")
        ],
        block_len: Annotated[
            int, typer.Option(help="Model input length per window (BOS included).", min=8)
        ] = 512,
        stride: Annotated[
            int | None, typer.Option(help="Window stride (default: no overlap).", min=1)
        ] = None,
        max_tokens: Annotated[
            int | None, typer.Option(help="Score only the first N tokens.", min=1)
        ] = None,
        batch_size: Annotated[int, typer.Option(min=1)] = 4,
        bos: Annotated[
            bool, typer.Option("--bos/--no-bos", help="Prepend BOS to every window (not scored).")
        ] = False,
        tasks: Annotated[
            str | None,
            typer.Option(
                "--tasks",
                help="Comma-separated lm-eval tasks for zero-shot accuracy; 'none' disables. "
                "Default: next_sentence (offline, built from --data; skipped with a note when the "
                "text is too short). The paper's arc_easy, arc_challenge, boolq, hellaswag, "
                "openbookqa, piqa, winogrande need Hugging Face hub access.",
            ),
        ] = None,
        mc_items: Annotated[
            int,
            typer.Option(
                "--mc-items",
                help="Questions of the offline next_sentence task (from --data).",
                min=1,
            ),
        ] = 200,
        task_cache: Annotated[
            Path | None,
            typer.Option(
                "--task-cache",
                help="Folder for built offline tasks (default: $EFFICIENTLLM_CACHE/tasks, "
                "else ~/.cache/efficientllm/tasks).",
            ),
        ] = None,
        limit: Annotated[
            int | None, typer.Option(help="Score only the first N items of each task.", min=1)
        ] = None,
    ) -> None:
        """Held-out perplexity of a model (hub id, folder or export), with its protocol, and
        zero-shot multiple-choice accuracy through the lm-eval harness."""
        from efficientllm.evaluation.mctask import TASK_NAME, NextSentenceSpec, build_task
        from efficientllm.training.data import read_documents, tokenize_documents

        docs = read_documents(data)
        names = [t.strip() for t in (tasks or TASK_NAME).split(",") if t.strip()]
        if [n.lower() for n in names] == ["none"]:
            names = []
        include = None
        if TASK_NAME in names:
            from efficientllm.assets import cache_root
            from efficientllm.errors import DataError

            root = task_cache if task_cache is not None else cache_root() / "tasks"
            try:
                include = build_task(
                    [d.text for d in docs], root, NextSentenceSpec(n_items=mc_items)
                )
            except DataError as err:
                if tasks is not None:  # asked for by name: an error, not a note
                    raise
                typer.echo(f"note: {TASK_NAME} skipped: {err}", err=True)
                names.remove(TASK_NAME)
        if names:
            from efficientllm.evaluation.harness import check_tasks

            check_tasks(names, include)  # unknown names fail before the model loads

        from efficientllm.evaluation.perplexity import perplexity
        from efficientllm.model_io import load_model, load_tokenizer

        m = load_model(model)
        tok = load_tokenizer(model)
        stream = tokenize_documents(docs, tok, add_bos=False)
        res = perplexity(
            m,
            stream,
            block_len=block_len,
            stride=stride,
            max_tokens=max_tokens,
            batch_size=batch_size,
            bos_id=tok.bos_token_id if bos else None,
        )
        typer.echo(f"perplexity {res.ppl:.4f}  ({res.protocol})")
        results: dict = {}
        if names:
            from efficientllm.evaluation.harness import format_task_line, run_tasks

            results = run_tasks(
                m, tok, names, include_path=include, batch_size=batch_size, limit=limit
            )
            for name, r in results.items():
                typer.echo(format_task_line(name, r))
        typer.echo(json.dumps({"perplexity": res.to_dict(), "tasks": results}))
