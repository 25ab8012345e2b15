"""Which API key goes to which server (README, "The paper's configuration", the judge paragraphs).

The key in OPENAI_API_KEY (the default `judge.api_key_env`) is sent to the OpenAI API only. Any other server
(`judge.base_url`) gets a key only when the params name the environment variable that holds it
(`judge.api_key_env: MY_SERVER_KEY`), and only over https or to this machine (loopback): a key sent over plain
http to another host can be read on the way. The key is read from the environment when a client is made and
never written anywhere.
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from emalib.core.errors import JudgeError

OPENAI_KEY_ENV = "OPENAI_API_KEY"
OPENAI_HOST = "api.openai.com"
# The SDK insists on some key; a server that wants none ignores this one, and it is no secret.
NO_KEY = "no-key-sent"


def is_openai_api(base_url: str | None) -> bool:
    """None (the SDK's default) or an https URL on api.openai.com."""
    if base_url is None:
        return True
    parts = urlsplit(base_url)
    return parts.scheme == "https" and parts.hostname == OPENAI_HOST


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_key_problem(base_url: str | None, api_key_env: str) -> str | None:
    """Why sending the key named by api_key_env to base_url would expose it, or None."""
    if base_url is None or api_key_env == OPENAI_KEY_ENV:
        return None  # no key leaves for a custom server under the default name
    parts = urlsplit(base_url)
    if parts.scheme == "https" or is_loopback(parts.hostname):
        return None
    return (f"judge.base_url: {base_url} is not https and not this machine; the key in {api_key_env} "
            f"(judge.api_key_env) is sent only over https or to 127.0.0.1/localhost")


def api_key_for(api_key_env: str, base_url: str | None) -> str:
    """The key to send to base_url (NO_KEY where none is to be sent); JudgeError when a key that is needed is
    not set, or would go over plain http to another host."""
    if is_openai_api(base_url):
        key = os.environ.get(api_key_env)
        if not key:
            raise JudgeError(f"judge.api_key_env: environment variable {api_key_env} is not set")
        return key
    if api_key_env == OPENAI_KEY_ENV:
        return NO_KEY  # OpenAI's key never goes to another server
    problem = insecure_key_problem(base_url, api_key_env)
    if problem is not None:
        raise JudgeError(problem)
    key = os.environ.get(api_key_env)
    if not key:
        raise JudgeError(f"judge.api_key_env: environment variable {api_key_env} (the key for {base_url}) is not set")
    return key
