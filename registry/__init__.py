"""registry: the location service and the credentials, kept in etcd.

* ``LocationStore``: every binding of the cluster, cached and watched for
  lookups without I/O, written in batched compare-and-swap Txns (``commit``).
* ``Binding`` (one registered contact), ``AorState`` / ``AorChange`` /
  ``plan_change`` (what a registrar reads and writes), ``address_of_record``,
  ``binding_id_for`` and ``contact_text`` (the identities a binding is kept under).
* ``UserStore`` (credentials cache, a ``worker.auth.UserDirectory``) and the admin
  functions ``add_user``, ``remove_user``, ``list_users``.
* ``load_or_create_nonce_secret``: the cluster's digest nonce key.

Errors: ``StoreUnavailableError`` (etcd did not answer), ``MalformedRecordError`` (a
stored value this version cannot read), both ``RegistryError``.
"""

from ._binding import Binding, address_of_record, binding_id_for, contact_text
from ._errors import MalformedRecordError, RegistryError, StoreUnavailableError
from ._location import (
    AorChange,
    AorState,
    CommitOutcome,
    CommitResult,
    CommitStatistics,
    LocationStore,
    plan_change,
)
from ._secret import load_or_create_nonce_secret
from ._users import (
    UserCredentials,
    UserStore,
    add_user,
    credentials_for,
    list_users,
    normalize_user,
    remove_user,
)

__all__ = [
    "AorChange",
    "AorState",
    "Binding",
    "CommitOutcome",
    "CommitResult",
    "CommitStatistics",
    "LocationStore",
    "MalformedRecordError",
    "RegistryError",
    "StoreUnavailableError",
    "UserCredentials",
    "UserStore",
    "add_user",
    "address_of_record",
    "binding_id_for",
    "contact_text",
    "credentials_for",
    "list_users",
    "load_or_create_nonce_secret",
    "normalize_user",
    "plan_change",
    "remove_user",
]
