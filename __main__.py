from vkpack.runtime.cli import main

raise SystemExit(main())
