"""Where things run: settings, the Redis and Ray connections, the artifact store."""
