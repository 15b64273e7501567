"""Run directories: the files one study writes, and the only code that knows their layout.

Imports point one way: runs/ imports nothing else from deepseemoe except errors."""
