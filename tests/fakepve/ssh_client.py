"""A tiny SSH client for tests that need one without a Rust SSH crate (uses the venv's asyncssh).

    python ssh_client.py keygen PRIVATE_KEY_PATH        # writes an ed25519 key, prints the public key
    python ssh_client.py run HOST PORT USER KEY COMMAND # prints {"exitcode", "stdout", "stderr"} as JSON
    python ssh_client.py run-all HOST PORT USER KEY     # stdin: a JSON list of commands, run one after
                                                        # another on ONE connection (as sombrero's build
                                                        # does: it outlives the removal of the host keys);
                                                        # prints a JSON list of those objects

`run` does not check the host key (the fake's are throwaway); a connection or auth failure prints
{"error": "..."} and exits 2.
"""

import asyncio
import json
import os
import sys

import asyncssh


def keygen(path):
    key = asyncssh.generate_private_key('ssh-ed25519', comment='sombrero-test')
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 'wb') as f:
        f.write(key.export_private_key())
    print(key.export_public_key().decode().strip())


async def run(host, port, user, key, command):
    try:
        async with asyncssh.connect(host, port=int(port), username=user, client_keys=[key], known_hosts=None,
                                    connect_timeout=10) as conn:
            result = await conn.run(command)
    except (OSError, asyncssh.Error) as e:
        print(json.dumps({'error': '{0}: {1}'.format(type(e).__name__, e)}))
        return 2
    print(json.dumps({'exitcode': result.exit_status, 'stdout': result.stdout, 'stderr': result.stderr}))
    return 0


async def run_all(host, port, user, key):
    commands = json.load(sys.stdin)
    results = []
    try:
        async with asyncssh.connect(host, port=int(port), username=user, client_keys=[key], known_hosts=None,
                                    connect_timeout=10) as conn:
            for command in commands:
                result = await conn.run(command)
                results.append({'exitcode': result.exit_status, 'stdout': result.stdout, 'stderr': result.stderr})
    except (OSError, asyncssh.Error) as e:
        print(json.dumps({'error': '{0}: {1} (after {2} commands)'.format(type(e).__name__, e, len(results))}))
        return 2
    print(json.dumps(results))
    return 0


if __name__ == '__main__':
    if sys.argv[1:2] == ['keygen']:
        keygen(sys.argv[2])
    elif sys.argv[1:2] == ['run']:
        sys.exit(asyncio.run(run(*sys.argv[2:7])))
    elif sys.argv[1:2] == ['run-all']:
        sys.exit(asyncio.run(run_all(*sys.argv[2:6])))
    else:
        sys.exit(__doc__)
