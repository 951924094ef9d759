"""The validated client credential that the service presents in TLS, as plain data.

``edge_agent.identity`` validates the IDevID and LDevID with ``cryptography``
and returns a ``DeviceIdentity`` that contains certificate objects. The service
keeps a ``ClientCredential`` instead: file paths, the chain as PEM and the
device id. ``load_credential_isolated`` runs the validation in a child process
(see ``edge_agent.isolated``), so the service never loads ``cryptography``.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edge_agent.config import IdentityConfig


@dataclass(frozen=True)
class ClientCredential:
    """The IDevID or LDevID that TLS presents: key location, PEM chain and device id.

    ``chain_pem`` contains the leaf first, then the intermediate CA
    certificates sent with it. ``key_passphrase`` stays out of ``repr``.
    """

    role: str
    subject: str
    cert_path: Path
    key_path: Path
    chain_pem: bytes
    device_id: str
    device_id_source: str
    key_source: str = "file"
    tpm_tcti: Optional[str] = None
    key_passphrase: Optional[bytes] = field(default=None, repr=False)


def load_credential(settings: IdentityConfig, device_id: Optional[str] = None) -> ClientCredential:
    """Validate the identity in this process and return the credential that TLS presents.

    Raises ``IdentityError`` when no configured credential is usable.
    """
    from edge_agent.identity import load_identity

    return load_identity(settings, device_id).credential()


def load_credential_isolated(settings: IdentityConfig, device_id: Optional[str] = None) -> ClientCredential:
    """Like ``load_credential``, but the validation runs in a child process."""
    from edge_agent import isolated

    return isolated.call("load_credential", settings, device_id)
