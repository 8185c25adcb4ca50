"""The scheduler: job specs and suites, the Redis job queue, dispatch, nightly runs, the CLI."""
