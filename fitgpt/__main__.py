from fitgpt.cli.main import main

raise SystemExit(main())
