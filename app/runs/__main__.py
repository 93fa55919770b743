import sys

from app.runs.cli import main

sys.exit(main())
