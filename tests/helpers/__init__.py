"""Helpers shared by the tests: paths to the real data, synthetic slides and bags, the viewer's test server."""
