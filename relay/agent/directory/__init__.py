"""The agent's directory (LDAP / Active Directory): who may hold a device, who is IT.

`Directory` answers two questions, asynchronously (ldap3 in worker threads, a bounded
number at a time, every operation under a timeout):

- `authenticate(user, password)`: bind as the user, then check the device group (or the
  admin group); a DirectoryUser or a Refusal with a one-line reason;
- `lookup(user)`: the user's standing now (active, disabled, deleted, not in the group),
  for the periodic re-check; raises DirectoryUnavailable rather than guess.

`read_directory_settings` reads the agent config's `directory:` section.
"""

from relay.agent.directory.client import (
    Directory,
    DirectoryError,
    DirectoryUnavailable,
    DirectoryUser,
    Refusal,
    RefusalReason,
    UserStatus,
)
from relay.agent.directory.filters import USERNAME_RULE, check_username, user_filter
from relay.agent.directory.settings import DirectorySettings, read_directory_settings

__all__ = [
    "USERNAME_RULE",
    "Directory",
    "DirectoryError",
    "DirectorySettings",
    "DirectoryUnavailable",
    "DirectoryUser",
    "Refusal",
    "RefusalReason",
    "UserStatus",
    "check_username",
    "read_directory_settings",
    "user_filter",
]
