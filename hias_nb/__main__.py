from hias_nb.cli import main

raise SystemExit(main())
