"""Locust load test for sipcluster: see README.md in this folder.

``locustfile.py`` is loaded by Locust (never imported by the server or the tests:
gevent monkey-patches sockets); ``python -m loadtest.locust.users`` creates the
users it registers as.
"""
