"""``python -m rllm.training``: the seeded training recipe (:mod:`rllm.training.recipe`)."""
import sys

from rllm.training.recipe import main

if __name__ == "__main__":
    sys.exit(main())
