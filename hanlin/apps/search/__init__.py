"""AI search: a local index (BM25 + dense, hybrid), a web backend (SearXNG) and an agent that plans,
searches, reads and answers with checked citations."""
