"""`python -m gradstore_server --store URI --model DIR [--host H] [--port P]` (same as `gradstore serve`)."""

import sys

from .cli import main

sys.exit(main())
