"""The read side: boards computed from the results in SQL (leaderboard, tracks, transfer)."""
