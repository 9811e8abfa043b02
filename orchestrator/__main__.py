from nptm.orchestrator.cli import main

raise SystemExit(main())
