import signal
import sys


def run() -> int:
    """`python -m mnist_jax`: a Ctrl-C while JAX and the library load (seconds) is noted, not raised (a
    KeyboardInterrupt raised inside JAX's import-time callbacks would be swallowed), and acted on once they are
    loaded; from then on Ctrl-C is Python's, until `train` installs its graceful stop."""
    noted: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    from mnist_jax import cli, train  # noqa: F401 - train: the heavy imports, here rather than in cli.main

    try:
        if noted:
            raise KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return cli.main()  # a later Ctrl-C: cli.main's one line and 130
    except KeyboardInterrupt:
        print(cli.INTERRUPTED, file=sys.stderr)
        return cli.INTERRUPTED_EXIT_CODE


raise SystemExit(run())
