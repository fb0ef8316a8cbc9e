"""Updates on the device. ``corral tuf-client`` (:mod:`.cli`, :mod:`.tuf_client`, :mod:`.fetcher`)
verifies them with python-tuf in a process of its own: the resident agent imports none of it."""
