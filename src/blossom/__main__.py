"""`python -m blossom`: the same as the `blossom` command."""

from blossom.cli import main

raise SystemExit(main())
