"""`python -m control_server` is `runsteer server`."""

from control_server.cli import main

raise SystemExit(main())
