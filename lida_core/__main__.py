from lida_core.cli import main

raise SystemExit(main())
