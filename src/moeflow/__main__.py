"""`python -m moeflow` (also what torchrun runs with `-m moeflow`)."""

import sys

from moeflow.cli import main

sys.exit(main())
