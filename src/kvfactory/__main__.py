"""``python -m kvfactory``: the same CLI as the ``kvfactory`` console script."""

from kvfactory.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
