"""
Test support shipped with txgraph: the backend conformance suite that every
backend (and third-party ones) runs, and helpers to start real components
(a Ceph dev cluster) for integration tests.
"""
