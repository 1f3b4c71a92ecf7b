"""The simulated guest OS behind a fake Proxmox VM: what is on its disk and what runs in it.

fakepve (the fake PVE API) has no guest: agent `exec` runs nothing and new VMs have no agent. This
module is the guest model the harness adds on top. A disk carries `contents` (a JSON-friendly dict:
os-release, installed packages, services, cloud-init state, machine-id, SSH host keys, apt state)
that follow the disk through import-from, template conversion and clones. A running VM has a
`Runtime` (active services, boot time). `Shell` runs the small command set a build and a validation
use (apt-get, systemctl, cloud-init, dpkg-query, ...) against both, for the agent and for SSH alike.
"""

import copy
import json
import re
import secrets
import shlex

UBUNTU_OS = {
    'id': 'ubuntu', 'name': 'Ubuntu', 'version_id': '24.04', 'version': '24.04.1 LTS (Noble Numbat)',
    'pretty_name': 'Ubuntu 24.04.1 LTS', 'version_codename': 'noble', 'kernel_release': '6.8.0-45-generic',
}

# A minimal Ubuntu 24.04 cloud image, cut down: enough names for drift checks to mean something.
UBUNTU_BASELINE = {
    'apt': '2.7.14build2', 'base-files': '13ubuntu10.1', 'bash': '5.2.21-2ubuntu4', 'ca-certificates': '20240203',
    'cloud-guest-utils': '0.33-1', 'cloud-init': '24.2-0ubuntu1~24.04.2', 'coreutils': '9.4-3ubuntu6',
    'cron': '3.0pl1-184ubuntu2', 'curl': '8.5.0-2ubuntu10.4', 'dbus': '1.14.10-4ubuntu4.1', 'dpkg': '1.22.6ubuntu6.1',
    'e2fsprogs': '1.47.0-2.4~exp1ubuntu4.1', 'gpg': '2.4.4-2ubuntu17', 'grub-pc': '2.12-1ubuntu7',
    'iproute2': '6.1.0-1ubuntu6', 'iputils-ping': '3:20240117-1build1', 'kmod': '31+20240202-2ubuntu7',
    'less': '590-2ubuntu2.1', 'libc6': '2.39-0ubuntu8.3', 'linux-image-6.8.0-41-generic': '6.8.0-41.41',
    'linux-image-6.8.0-45-generic': '6.8.0-45.45', 'linux-image-virtual': '6.8.0-45.45', 'logrotate': '3.21.0-2build1',
    'lsb-release': '12.0-2', 'nano': '7.2-2build1', 'netplan.io': '1.0.1-1ubuntu2~24.04.1',
    'openssh-client': '1:9.6p1-3ubuntu13.4', 'openssh-server': '1:9.6p1-3ubuntu13.4', 'python3': '3.12.3-0ubuntu2',
    'python3-yaml': '6.0.1-2build2', 'rsyslog': '8.2312.0-3ubuntu9', 'sudo': '1.9.15p5-3ubuntu5',
    'systemd': '255.4-1ubuntu8.4', 'systemd-sysv': '255.4-1ubuntu8.4', 'tzdata': '2024a-3ubuntu1.1',
    'udev': '255.4-1ubuntu8.4', 'ubuntu-minimal': '1.539', 'util-linux': '2.39.3-9ubuntu6.1',
    'vim-tiny': '2:9.1.0016-1ubuntu7.2',
}
# What `apt-get install` can find once `apt-get update` has run (besides what is installed).
UBUNTU_REPOSITORY = {
    'qemu-guest-agent': '1:8.2.2+ds-0ubuntu1.4', 'htop': '3.3.0-4build1', 'jq': '1.7.1-3build1',
    'docker.io': '24.0.7-0ubuntu4.1', 'nginx': '1.24.0-2ubuntu7.1', 'build-essential': '12.10ubuntu1',
}
# What `apt-get upgrade` brings once `apt-get update` has run.
UBUNTU_UPGRADES = {
    'openssh-client': '1:9.6p1-3ubuntu13.5', 'openssh-server': '1:9.6p1-3ubuntu13.5', 'libc6': '2.39-0ubuntu8.4',
    'systemd': '255.4-1ubuntu8.5', 'systemd-sysv': '255.4-1ubuntu8.5', 'udev': '255.4-1ubuntu8.5',
}
# Services a package brings: name -> enabled right after install. qemu-guest-agent is a static unit
# started by udev at boot when the virtio port exists, so it is not active right after install.
SERVICES_OF = {
    'openssh-server': {'ssh': True},
    'cloud-init': {'cloud-init-local': True, 'cloud-init': True, 'cloud-config': True, 'cloud-final': True},
    'qemu-guest-agent': {'qemu-guest-agent': True},
    'cron': {'cron': True},
    'rsyslog': {'rsyslog': True},
    'systemd': {'systemd-journald': True, 'systemd-networkd': True, 'systemd-resolved': True},
    'nginx': {'nginx': True},
    'docker.io': {'docker': True},
}
# PVE seconds a command takes; exec-status answers `exited: 0` until then.
DURATIONS = {'apt-get update': 5, 'apt-get upgrade': 30, 'apt-get dist-upgrade': 30, 'apt-get full-upgrade': 30,
             'apt-get install': 10, 'apt-get autoremove': 3, 'apt-get remove': 3, 'apt-get purge': 3}


def default_contents(agent=False):
    """A fresh Ubuntu 24.04 cloud image: cloud-init never ran, no guest agent unless `agent`."""
    packages = dict(UBUNTU_BASELINE)
    if agent:
        packages['qemu-guest-agent'] = UBUNTU_REPOSITORY['qemu-guest-agent']
    return normalise({'os': dict(UBUNTU_OS), 'packages': packages})


def normalise(contents):
    """Fill every key of a contents dict; a test may give only a few (e.g. just `packages`)."""
    c = copy.deepcopy(contents or {})
    c.setdefault('os', dict(UBUNTU_OS))
    c.setdefault('packages', dict(UBUNTU_BASELINE))
    if isinstance(c['packages'], list):
        c['packages'] = dict((p, UBUNTU_BASELINE.get(p) or UBUNTU_REPOSITORY.get(p) or '1.0') for p in c['packages'])
    c.setdefault('repository', dict(UBUNTU_REPOSITORY))
    c.setdefault('upgrades', dict(UBUNTU_UPGRADES))
    c.setdefault('autoremovable', ['linux-image-6.8.0-41-generic'])
    services = c.setdefault('services', {})
    for pkg in c['packages']:
        for svc, enabled in SERVICES_OF.get(pkg, {}).items():
            services.setdefault(svc, {'enabled': enabled})
    c.setdefault('cloud_init', {'status': 'not-run', 'instance_id': None, 'logs': False})
    c.setdefault('machine_id', '')
    c.setdefault('ssh_host_keys', False)
    c.setdefault('apt_lists', False)
    c.setdefault('apt_cache', False)
    c.setdefault('hostname', 'ubuntu')
    return c


class Runtime(object):
    """What only exists while a VM runs: the boot it belongs to, active services, exec results."""

    def __init__(self, started_at):
        self.started_at = started_at
        self.active = set()
        self.cloud_init_done_at = None
        self.execs = {}
        self.pid = 1000


class Shell(object):
    """Runs command lines against a guest's contents and runtime; returns (exitcode, stdout, stderr, secs).

    `failures` is a list of rules {'pattern': regex, 'exitcode': n, 'stderr': text, 'stdout': text,
    'times': n or None}: a simple command whose line matches fails that way and has no effect.
    `settings` holds 'cloud_init' ('done' | 'error' | 'degraded'); `on_poweroff` is called for
    shutdown/poweroff; `now_secs` is the PVE seconds since boot (for cloud-init still running).
    """

    def __init__(self, contents, runtime, failures, settings, on_poweroff, pve_secs_since_boot):
        self.c = contents
        self.rt = runtime
        self.failures = failures
        self.settings = settings
        self.on_poweroff = on_poweroff
        self.since_boot = pve_secs_since_boot
        self.secs = 0.0
        self.errexit = False

    # ------------------------------------------------------------ parsing

    def run(self, argv, input_data=None):
        """An agent exec / SSH exec: argv (a shell with -c, a shell reading input-data, or a program)."""
        argv = [str(a) for a in argv]
        prog = argv[0].rsplit('/', 1)[-1] if argv else ''
        if prog in ('sh', 'bash', 'dash'):
            flags = [a for a in argv[1:] if a.startswith('-')]
            rest = [a for a in argv[1:] if not a.startswith('-')]
            errexit = any('e' in f for f in flags)
            if any('c' in f for f in flags):
                return self.script(rest[0] if rest else '', errexit)
            return self.script(input_data or '', errexit)
        return self.simple(argv)

    def script(self, text, errexit=False):
        """A small subset of sh: `;`, `&&`, `||`, newlines, `set -e`, a `| filter` is not run (its
        input passes through), redirections are dropped, `exit n` ends the script."""
        text = re.sub(r'\s*(?:&|\d*)>>?\s*(?:&\d+|[^\s;&|]+)', '', text)  # 2>&1, > /dev/null, &>> log
        text = re.sub(r'\s*<\s*[^\s;&|]+', '', text)
        lexer = shlex.shlex(text.replace('\n', ';'), posix=True, punctuation_chars=';&|')
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError as e:
            return 2, '', 'sh: 1: Syntax error: {0}\n'.format(e), 0
        self.errexit = errexit
        code, out, err = 0, [], []
        op, cmd, in_filter = ';', [], False
        for tok in tokens + [';']:
            if tok not in (';', '&&', '||', '|', '&'):
                if not in_filter:
                    cmd.append(tok)
                continue
            if cmd and not ((op == '&&' and code != 0) or (op == '||' and code == 0)):
                rc, o, e, _ = self.simple(cmd)
                out.append(o)
                err.append(e)
                if isinstance(rc, tuple):  # `exit n`
                    return rc[1], ''.join(out), ''.join(err), self.secs
                code = rc
                if code != 0 and self.errexit and tok in (';', '&', '|'):
                    return code, ''.join(out), ''.join(err), self.secs
            cmd = []
            in_filter = tok == '|'
            if tok != '|':
                op = ';' if tok == '&' else tok
        return code, ''.join(out), ''.join(err), self.secs

    def simple(self, argv):
        """One simple command: strips sudo/env/VAR=... prefixes, applies failure rules, then runs it."""
        argv = list(argv)
        while argv:
            head = argv[0]
            if head in ('sudo', 'env', 'nohup', 'command', 'exec'):
                argv.pop(0)
                while argv and argv[0].startswith('-'):
                    argv.pop(0)
            elif head == 'timeout' and len(argv) > 1:
                argv = argv[2:]
            elif re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', head):
                argv.pop(0)
            else:
                break
        if not argv:
            return 0, '', '', 0
        line = ' '.join(argv)
        for rule in self.failures:
            if re.search(rule['pattern'], line):
                if rule.get('times') is not None:
                    if rule['times'] <= 0:
                        continue  # used up
                    rule['times'] -= 1
                return int(rule.get('exitcode', 1)), rule.get('stdout', ''), rule.get('stderr', ''), 0
        prog = argv[0].rsplit('/', 1)[-1]
        handler = getattr(self, 'cmd_' + prog.replace('-', '_').replace('.', '_'), None)
        if prog in ('true', ':'):
            return 0, '', '', 0
        if prog == 'false':
            return 1, '', '', 0
        if prog == 'exit':
            return ('exit', int(argv[1]) if len(argv) > 1 else 0), '', '', 0
        if handler is None:
            return 127, '', 'sh: 1: {0}: not found\n'.format(argv[0]), 0
        result = handler(argv[1:])
        args = iter(argv[1:])
        verb = ''
        for a in args:
            if a in ('-o', '--option', '-c', '-t'):
                next(args, None)
            elif not a.startswith('-'):
                verb = a
                break
        self.secs += DURATIONS.get(prog + ' ' + verb, 0)
        return result + (0,) if len(result) == 3 else result

    # ------------------------------------------------------------ commands

    def cmd_echo(self, args):
        newline = '\n'
        if args and args[0] == '-n':
            args, newline = args[1:], ''
        return 0, ' '.join(args) + newline, ''

    def cmd_sleep(self, args):
        try:
            self.secs += float(args[0])
        except (IndexError, ValueError):
            return 1, '', 'sleep: missing operand\n'
        return 0, '', ''

    def cmd_set(self, args):
        if any(a.startswith('-') and 'e' in a for a in args) or args[:2] == ['-o', 'errexit']:
            self.errexit = True
        return 0, '', ''

    def cmd_export(self, args):
        return 0, '', ''

    cmd_sync = cmd_export

    def cmd_hostname(self, args):
        return 0, self.c['hostname'] + '\n', ''

    def cmd_uname(self, args):
        return 0, (self.c['os']['kernel_release'] if '-r' in args else 'Linux') + '\n', ''

    def cmd_id(self, args):
        return 0, ('0' if '-u' in args else 'uid=0(root) gid=0(root) groups=0(root)') + '\n', ''

    def cmd_cat(self, args):
        out = []
        for path in args:
            if path in ('/etc/os-release', '/usr/lib/os-release'):
                o = self.c['os']
                out.append('PRETTY_NAME="{0}"\nNAME="{1}"\nVERSION_ID="{2}"\nVERSION="{3}"\nVERSION_CODENAME={4}\n'
                           'ID={5}\n'.format(o.get('pretty_name', ''), o.get('name', ''), o.get('version_id', ''),
                                            o.get('version', ''), o.get('version_codename', ''), o.get('id', '')))
            elif path == '/etc/machine-id':
                out.append(self.c['machine_id'] + ('\n' if self.c['machine_id'] else ''))
            elif path == '/etc/hostname':
                out.append(self.c['hostname'] + '\n')
            else:
                return 1, ''.join(out), 'cat: {0}: No such file or directory\n'.format(path)
        return 0, ''.join(out), ''

    def cmd_truncate(self, args):
        if args[-1:] == ['/etc/machine-id']:
            self.c['machine_id'] = ''
        return 0, '', ''

    def cmd_rm(self, args):
        force = any(a.startswith('-') and 'f' in a for a in args)
        for path in (a for a in args if not a.startswith('-')):
            if path.startswith('/etc/ssh/ssh_host_'):
                self.c['ssh_host_keys'] = False
            elif path == '/etc/machine-id':
                self.c['machine_id'] = ''
            elif path.startswith('/var/lib/apt/lists'):
                self.c['apt_lists'] = False
            elif path.startswith('/var/lib/cloud'):
                self.c['cloud_init']['status'] = 'not-run'
            elif not force and '*' not in path:
                return 1, '', "rm: cannot remove '{0}': No such file or directory\n".format(path)
        return 0, '', ''

    def cmd_shutdown(self, args):
        self.on_poweroff()
        return 0, '', ''

    cmd_poweroff = cmd_shutdown

    def cmd_systemctl(self, args):
        opts = [a for a in args if a.startswith('-')]
        words = [a for a in args if not a.startswith('-')]
        if not words:
            return 1, '', 'systemctl: missing verb\n'
        verb, units = words[0], [u[:-len('.service')] if u.endswith('.service') else u for u in words[1:]]
        services = self.c['services']
        if verb in ('poweroff', 'halt'):
            return self.cmd_shutdown([])
        if verb == 'daemon-reload':
            return 0, '', ''
        if verb in ('is-active', 'is-enabled'):
            out, code = [], 0
            for unit in units:
                if verb == 'is-active':
                    state = 'active' if unit in self.rt.active else 'inactive'
                    code = code or (0 if state == 'active' else 3)
                else:
                    state = 'enabled' if services.get(unit, {}).get('enabled') else 'disabled'
                    if unit not in services:
                        state = 'not-found'
                    code = code or (0 if state == 'enabled' else 1)
                out.append(state + '\n')
            return code, '' if '--quiet' in opts or '-q' in opts else ''.join(out), ''
        for unit in units:
            if unit not in services:
                what = {'enable': 'Failed to enable unit', 'disable': 'Failed to disable unit',
                        'start': 'Failed to start {0}.service'.format(unit)}.get(verb, 'Failed to {0} unit'.format(verb))
                if verb in ('start', 'restart', 'stop'):
                    return 5, '', '{0}: Unit {1}.service not found.\n'.format(what, unit)
                return 1, '', '{0}: Unit file {1}.service does not exist.\n'.format(what, unit)
        for unit in units:
            if verb == 'enable':
                services[unit]['enabled'] = True
                if '--now' in opts:
                    self.rt.active.add(unit)
            elif verb == 'disable':
                services[unit]['enabled'] = False
                if '--now' in opts:
                    self.rt.active.discard(unit)
            elif verb in ('start', 'restart', 'reload-or-restart'):
                self.rt.active.add(unit)
            elif verb == 'stop':
                self.rt.active.discard(unit)
            else:
                return 1, '', 'Unknown command verb {0}.\n'.format(verb)
        return 0, '', ''

    def cmd_apt_get(self, args):
        words, it = [], iter(args)
        for a in it:
            if a in ('-o', '--option', '-c', '--config-file', '-t', '--target-release'):
                next(it, None)  # the option's value
            elif not a.startswith('-'):
                words.append(a)
        yes = any(a in ('-y', '--yes', '--assume-yes', '-qy', '-yq') for a in args)
        if not words:
            return 100, '', 'E: Invalid operation\n'
        verb, names = words[0], words[1:]
        c = self.c
        if verb == 'update':
            c['apt_lists'] = True
            return 0, ('Hit:1 http://archive.ubuntu.com/ubuntu noble InRelease\n'
                       'Get:2 http://security.ubuntu.com/ubuntu noble-security InRelease [126 kB]\n'
                       'Reading package lists...\n'), ''
        if verb in ('upgrade', 'dist-upgrade', 'full-upgrade'):
            todo = dict((p, v) for p, v in c['upgrades'].items() if p in c['packages']) if c['apt_lists'] else {}
            if todo and not yes:
                return 1, 'Do you want to continue? [Y/n] Abort.\n', ''
            c['packages'].update(todo)
            for p in todo:
                del c['upgrades'][p]
            if todo:
                c['apt_cache'] = True
            return 0, '{0} upgraded, 0 newly installed, 0 to remove and 0 not upgraded.\n'.format(len(todo)), ''
        if verb == 'install':
            missing = [n for n in names if n not in c['packages']]
            for name in missing:
                if not c['apt_lists'] or name not in c['repository']:
                    return 100, 'Reading package lists...\n', 'E: Unable to locate package {0}\n'.format(name)
            if missing and not yes:
                return 1, 'Do you want to continue? [Y/n] Abort.\n', ''
            out = []
            for name in names:
                if name in c['packages']:
                    out.append('{0} is already the newest version ({1}).\n'.format(name, c['packages'][name]))
                    continue
                c['packages'][name] = c['repository'][name]
                for svc, enabled in SERVICES_OF.get(name, {}).items():
                    c['services'].setdefault(svc, {'enabled': enabled})
                out.append('Setting up {0} ({1}) ...\n'.format(name, c['packages'][name]))
            if missing:
                c['apt_cache'] = True
            out.append('0 upgraded, {0} newly installed, 0 to remove and 0 not upgraded.\n'.format(len(missing)))
            return 0, ''.join(out), ''
        if verb in ('remove', 'purge', 'autoremove'):
            targets = names if verb != 'autoremove' else [p for p in c['autoremovable'] if p in c['packages']]
            if verb == 'autoremove':
                c['autoremovable'] = []
            if targets and not yes:
                return 1, 'Do you want to continue? [Y/n] Abort.\n', ''
            for name in targets:
                c['packages'].pop(name, None)
                for svc in SERVICES_OF.get(name, {}):
                    c['services'].pop(svc, None)
                    self.rt.active.discard(svc)
            return 0, '0 upgraded, 0 newly installed, {0} to remove and 0 not upgraded.\n'.format(len(targets)), ''
        if verb in ('clean', 'autoclean'):
            c['apt_cache'] = False
            return 0, '', ''
        return 100, '', 'E: Invalid operation {0}\n'.format(verb)

    cmd_apt = cmd_apt_get

    def cmd_dpkg_query(self, args):
        fmt = '${Package}\t${Version}\n'
        names = []
        it = iter(args)
        for a in it:
            if a in ('-f', '--showformat'):
                fmt = next(it, fmt)
            elif a.startswith(('-f=', '--showformat=')):
                fmt = a.split('=', 1)[1]
            elif not a.startswith('-'):
                names.append(a)
        fmt = fmt.replace('\\n', '\n').replace('\\t', '\t')
        pkgs = self.c['packages']
        chosen = sorted(pkgs) if not names else [n for n in names if n in pkgs]
        out = []
        for name in chosen:
            out.append(fmt.replace('${binary:Package}', name).replace('${Package}', name)
                       .replace('${Version}', pkgs[name]).replace('${Status}', 'install ok installed')
                       .replace('${db:Status-Abbrev}', 'ii ')
                       .replace('${Installed-Size}', '100'))
        err = ''.join('dpkg-query: no packages found matching {0}\n'.format(n) for n in names if n not in pkgs)
        return (1 if err else 0), ''.join(out), err

    def cmd_dpkg(self, args):
        if args[:1] == ['-l'] or args[:1] == ['--list']:
            pkgs = self.c['packages']
            lines = ['ii  {0:<40} {1:<30} amd64 -\n'.format(n, pkgs[n]) for n in sorted(pkgs)]
            return 0, ''.join(lines), ''
        if args[:1] == ['-s'] or args[:1] == ['--status']:
            return self.cmd_dpkg_query(['-W'] + args[1:])
        return 2, '', 'dpkg: error: need an action option\n'

    def cmd_cloud_init(self, args):
        if 'cloud-init' not in self.c['packages']:
            return 127, '', 'sh: 1: cloud-init: not found\n'
        words = [a for a in args if not a.startswith('-')]
        verb = words[0] if words else ''
        ci = self.c['cloud_init']
        if verb == 'status':
            remaining = 0.0
            if self.rt.cloud_init_done_at is not None:
                remaining = max(0.0, self.rt.cloud_init_done_at - self.since_boot)
            if remaining > 0 and '--wait' not in args and '-w' not in args:
                return 0, 'status: running\n', ''
            self.secs += remaining
            status = ci['status']
            if '--format' in args or any(a.startswith('--format=') for a in args):
                shown = {'not-run': 'not started'}.get(status, status)
                detail = {'status': shown, 'extended_status': shown, 'errors': ['script-user failure']
                          if status == 'error' else [], 'recoverable_errors': {}, 'boot_status_code': 'enabled-by-generator'}
                return {'error': 1, 'degraded': 2}.get(status, 0), json.dumps(detail) + '\n', ''
            long = '--long' in args or '-l' in args
            if status == 'error':
                return 1, 'status: error\n' + ('detail:\nscript-user failure\n' if long else ''), ''
            if status == 'degraded':
                return 2, 'status: degraded done\n', ''
            if status == 'not-run':
                return 0, 'status: not started\n', ''
            return 0, 'status: done\n', ''
        if verb == 'clean':
            ci['status'] = 'not-run'
            ci['instance_id'] = None
            if '--logs' in args or '-l' in args:
                ci['logs'] = False
            if '--machine-id' in args:
                self.c['machine_id'] = ''
            if '--seed' in args or '-s' in args:
                pass
            return 0, '', ''
        return 2, '', 'cloud-init: error: invalid choice: {0!r}\n'.format(verb)


def new_machine_id():
    return secrets.token_hex(16)


def boot(contents, runtime, settings, instance_id):
    """What happens when the VM boots: enabled services start, systemd fills an empty machine-id,
    cloud-init runs once per instance (regenerating SSH host keys) and ends as the settings say."""
    c = contents
    runtime.active = set(name for name, svc in c['services'].items() if svc.get('enabled'))
    if not c['machine_id']:
        c['machine_id'] = new_machine_id()
    if 'cloud-init' in c['packages']:
        ci = c['cloud_init']
        if ci['status'] == 'not-run' or ci.get('instance_id') != instance_id:
            ci['instance_id'] = instance_id
            ci['status'] = settings.get('cloud_init') or 'done'
            ci['logs'] = True
            c['ssh_host_keys'] = True
            runtime.cloud_init_done_at = float(settings.get('cloud_init_secs', 10))
    elif not c['ssh_host_keys'] and 'openssh-server' in c['packages']:
        c['ssh_host_keys'] = True  # sshd-keygen on first boot without cloud-init


def os_info(contents):
    o = contents['os']
    return {'id': o.get('id'), 'name': o.get('name'), 'pretty-name': o.get('pretty_name'),
            'version': o.get('version'), 'version-id': o.get('version_id'),
            'kernel-release': o.get('kernel_release'), 'kernel-version': '#45-Ubuntu SMP PREEMPT_DYNAMIC',
            'machine': 'x86_64'}
