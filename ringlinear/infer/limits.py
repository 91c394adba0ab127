"""The server's default limits, apart so that the CLI shows them without loading FastAPI."""

MAX_REQUEST_BYTES = 16 * 2**20  # a full 128K-token context sent as token ids is about 1 MB of JSON
SHUTDOWN_TIMEOUT = 30.0  # seconds requests in flight get after SIGTERM; Kubernetes' grace period too
