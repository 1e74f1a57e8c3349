"""`python -m qwen3_chat` runs the `qwen3` command."""

from qwen3_chat.cli.app import main

if __name__ == "__main__":
    main()
