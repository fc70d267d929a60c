"""`python -m pipeline` and the `pipeline` command: the CLI, imported only when it runs.

Decode workers are spawned processes, which import the parent's main module again: kept this small,
a worker does not load the CLI and, through it, faiss, h5py and every stage.
"""


def main() -> None:
    from .cli import app

    app(prog_name="pipeline")


if __name__ == "__main__":
    main()
