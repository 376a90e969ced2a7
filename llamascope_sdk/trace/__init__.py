"""Attribution graphs over transcoders (issue 25): the demo transcoder set and its quality
measures live in :mod:`.demo` and :mod:`.quality`."""
