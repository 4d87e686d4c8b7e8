"""``python -m lossd``: the lossd command-line client (same as ``lossd-cli``)."""

from ._cli import entry_point

if __name__ == "__main__":
    entry_point()
