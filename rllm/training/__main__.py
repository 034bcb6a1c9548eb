"""``python -m rllm.training``: the seeded training recipe (:mod:`rllm.training.recipe`)."""
from rllm.training.recipe import main

if __name__ == "__main__":
    main()  # returns the run's report; bad input exits 2 inside
