from llamapool.cli import main

raise SystemExit(main())
