"""`python -m vkpack`: the same as the `vkpack` command (vkpack.runtime.cli)."""

from vkpack.runtime.cli import main

raise SystemExit(main())
