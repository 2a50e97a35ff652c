"""compress: make Llama-family language models smaller and faster, and export them for other stacks."""

__version__ = "0.1.0"
