"""Test worker that is handed an unusable port (the child's own check must refuse it)."""

import os

from multifrost_trio import ChildWorker

if __name__ == "__main__":
    os.environ["COMLINK_ZMQ_PORT"] = "80"
    ChildWorker().run()
