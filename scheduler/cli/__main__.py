"""``python -m gauntlet.scheduler.cli``: the same as the ``gauntlet`` console script."""

from gauntlet.scheduler.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
