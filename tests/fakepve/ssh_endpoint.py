"""SSH into fake guests: a real SSH server (asyncssh) per running VM, on the loopback address of
its `ipconfig0` (`ip=127.x.y.z/n`) and the harness's SSH port.

A VM listens once it is running, booted (`boot_secs`), with openssh-server installed, the `ssh`
service active and host keys present (cloud-init makes them at first boot). It accepts the user
cloud-init would create (`ciuser`, else `ubuntu`) with a key from `sshkeys` (url-encoded, one key
per line, as PVE stores it), and runs exec requests through the same simulated shell as the agent.
Interactive shells are refused. A stopped VM stops listening.
"""

import asyncio
import logging
import socket
import urllib.parse

import asyncssh

LOG = logging.getLogger('fakepve-harness.ssh')
POLL_SECS = 0.05


def authorized_keys(config):
    text = urllib.parse.unquote(str(config.get('sshkeys') or ''))
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        try:
            keys.append(asyncssh.import_public_key(line).public_data)
        except (asyncssh.KeyImportError, ValueError):
            LOG.warning('ignoring an sshkeys line that is not a public key')
    return keys


def loopback_ip(config):
    value = str(config.get('ipconfig0') or '')
    for part in value.split(','):
        if part.startswith('ip=') and '/' in part:
            ip = part[3:].split('/', 1)[0]
            if ip.startswith('127.'):
                return ip
    return None


class _Server(asyncssh.SSHServer):
    def __init__(self, endpoints, vmid):
        self.ep = endpoints
        self.vmid = vmid

    def begin_auth(self, username):
        return True

    def password_auth_supported(self):
        return False

    def public_key_auth_supported(self):
        return True

    def validate_public_key(self, username, key):
        vm = self.ep.h.pve.vm(self.vmid)
        if vm is None:
            return False
        if username != str(vm.config.get('ciuser') or 'ubuntu'):
            return False
        return key.public_data in authorized_keys(vm.config)


class SshEndpoints(object):
    def __init__(self, harness):
        self.h = harness
        self.port = None
        self.servers = {}  # vmid -> (ip, server)
        self.task = None

    async def pick_port(self):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((self.h.host, 0))
            self.port = s.getsockname()[1]
        self.task = asyncio.ensure_future(self.watch())
        return self.port

    def ready(self, vm):
        """(ip, contents) when the VM's sshd would answer, else None."""
        if vm.status != 'running':
            return None
        ip = loopback_ip(vm.config)
        contents = self.h.pve.guest_of(vm)
        if ip is None or contents is None or 'openssh-server' not in contents['packages']:
            return None
        rt = self.h.runtime_of(vm, contents)
        booted = self.h.pve_secs_since(vm.started_at) >= float(self.h.settings_for(vm.vmid).get('boot_secs', 15))
        if not booted or 'ssh' not in rt.active or not contents['ssh_host_keys']:
            return None
        return ip

    async def watch(self):
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep serving; the test sees a refused connection
                LOG.exception('ssh endpoint sync failed')
            await asyncio.sleep(POLL_SECS)

    async def sync(self):
        pve = self.h.pve
        wanted = {}
        for vm in list(pve.vms):
            ip = self.ready(vm)
            if ip:
                wanted[vm.vmid] = ip
        for vmid, (ip, server) in list(self.servers.items()):
            if wanted.get(vmid) != ip:
                del self.servers[vmid]
                server.close()
        for vmid, ip in wanted.items():
            if vmid in self.servers:
                continue
            try:
                server = await asyncssh.create_server(
                    lambda vmid=vmid: _Server(self, vmid), host=ip, port=self.port,
                    server_host_keys=[asyncssh.generate_private_key('ssh-ed25519')],
                    process_factory=lambda process, vmid=vmid: self.serve(process, vmid),
                    reuse_address=True)
            except OSError as e:
                LOG.warning('VM %s: cannot listen on %s:%s: %s', vmid, ip, self.port, e)
                continue
            self.servers[vmid] = (ip, server)

    async def serve(self, process, vmid):
        vm = self.h.pve.vm(vmid)
        contents = self.h.pve.guest_of(vm) if vm else None
        if vm is None or contents is None or vm.status != 'running':
            process.exit(255)
            return
        command = process.command
        if not command:
            process.stderr.write('fakepve harness: interactive shells are not modelled; send a command\n')
            process.exit(1)
            return
        rt = self.h.runtime_of(vm, contents)
        # sshd runs the command with the user's login shell: bash for cloud-init's users.
        code, out, err, secs = self.h.run(vm, contents, rt, ['bash', '-c', command], None, via='ssh')
        await self.h.pve.pause(secs)
        process.stdout.write(out)
        process.stderr.write(err)
        process.exit(code if isinstance(code, int) else 0)

    async def close_all(self):
        for _vmid, (_ip, server) in list(self.servers.items()):
            server.close()
        self.servers.clear()
        if self.task and self.h.pve is None:
            self.task.cancel()

    async def stop(self):
        if self.task:
            self.task.cancel()
        await self.close_all()
