"""``python -m efficientllm.cli`` = ``efficientllm``."""

from efficientllm.cli import main

main()
