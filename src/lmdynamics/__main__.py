from lmdynamics.cli import main

raise SystemExit(main())
