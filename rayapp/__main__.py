from rayapp.cli import main

raise SystemExit(main())
