"""``python -m forgetscope`` (and ``accelerate launch -m forgetscope``)."""

import sys

from forgetscope.cli import main

sys.exit(main())
