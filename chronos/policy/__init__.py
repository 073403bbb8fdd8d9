"""Lab policies, one module each: idle reclaim, fair share, bookings, reports and metrics.

The decisions (``idle``, ``fairshare``, the booking rules in ``bookings``, ``report``) are pure: they
take records and samples and return decisions or figures. ``runtime`` is the engine's stateful
helper that gathers their inputs at most every few seconds and applies what they decide.
"""
