"""`paratransfer` command line: the entry point, shared options, one module per command."""

from paratransfer.io.moved import reexport

__getattr__, __dir__ = reexport("paratransfer.cli.entry")


def main(argv=None) -> int:
    """The `paratransfer` console script (imports the command line only when it runs)."""
    from paratransfer.cli.entry import main as run

    return run(argv)
