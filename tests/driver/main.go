// cni-driver is a minimal CNI runtime used by the bridge-nat integration
// tests. It drives a conflist through libcni (1.1.2) and emulates the parts
// of libcni 1.2 that the Debian packages lack: cniVersion 1.1.0 for the
// bridge-nat plugin, GC and STATUS.
//
// Build: GOPATH=/usr/share/gocode GO111MODULE=off go build -o cni-driver .
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
)

const (
	pluginType = "bridge-nat"
	v110       = "1.1.0"
	v100       = "1.0.0"
)

type options struct {
	conflist, netns, containerID, ifname, cacheDir, plugin string
	portMappings, ips                                      []interface{}
	valid                                                  []map[string]interface{}
	args                                                   [][2]string
}

// rawList is a conflist kept as generic JSON so entries round-trip unchanged.
type rawList struct {
	all     map[string]interface{}
	name    string
	version string
	plugins []map[string]interface{}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cni-driver <add|check|del|gc|status|version> --conflist FILE [flags]")
		os.Exit(2)
	}
	var o options
	var pm, valid, cniArgs, ips string
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	fs.StringVar(&o.conflist, "conflist", "", "network configuration list file")
	fs.StringVar(&o.netns, "netns", "", "path of the container network namespace")
	fs.StringVar(&o.containerID, "container-id", "cni-driver-test", "container ID")
	fs.StringVar(&o.ifname, "ifname", "eth0", "container interface name")
	fs.StringVar(&o.cacheDir, "cache-dir", "", "libcni cache directory (default /var/lib/cni)")
	fs.StringVar(&pm, "port-mappings", "", "JSON array for the portMappings capability")
	fs.StringVar(&valid, "valid", "[]", "JSON array of {containerID,ifname} valid attachments (gc)")
	fs.StringVar(&o.plugin, "plugin", pluginType, "plugin type (version)")
	fs.StringVar(&cniArgs, "args", "", "CNI_ARGS for add/check/del, as K=V;K=V")
	fs.StringVar(&ips, "ips", "", "JSON array for the ips capability (addresses host-local is asked for)")
	_ = fs.Parse(os.Args[2:])
	if pm != "" {
		if err := json.Unmarshal([]byte(pm), &o.portMappings); err != nil {
			fail(fmt.Errorf("--port-mappings: %w", err))
		}
	}
	if ips != "" {
		if err := json.Unmarshal([]byte(ips), &o.ips); err != nil {
			fail(fmt.Errorf("--ips: %w", err))
		}
	}
	for _, kv := range strings.Split(cniArgs, ";") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			o.args = append(o.args, [2]string{k, v})
		}
	}
	if err := json.Unmarshal([]byte(valid), &o.valid); err != nil {
		fail(fmt.Errorf("--valid: %w", err))
	}
	if o.valid == nil {
		o.valid = []map[string]interface{}{}
	}
	if err := run(context.Background(), os.Args[1], &o); err != nil {
		fail(err)
	}
}

// fail prints err as a CNI error object on stdout and exits 1.
func fail(err error) {
	var cniErr *types.Error
	if !errors.As(err, &cniErr) {
		cniErr = types.NewError(types.ErrInternal, err.Error(), "")
	}
	_ = json.NewEncoder(os.Stdout).Encode(cniErr)
	os.Exit(1)
}

func run(ctx context.Context, cmd string, o *options) error {
	cniPath := filepath.SplitList(os.Getenv("CNI_PATH"))
	cni := libcni.NewCNIConfigWithCacheDir(cniPath, o.cacheDir, nil)
	if cmd == "version" {
		info, err := cni.GetVersionInfo(ctx, o.plugin)
		if err != nil {
			return err
		}
		return info.Encode(os.Stdout)
	}
	list, err := loadList(o.conflist)
	if err != nil {
		return err
	}
	switch cmd {
	case "gc":
		return invokeEach(ctx, cniPath, list, "GC", func(conf map[string]interface{}) {
			conf["cni.dev/valid-attachments"] = o.valid
			conf["cni.dev/attachments"] = o.valid
		})
	case "status":
		return invokeEach(ctx, cniPath, list, "STATUS", func(map[string]interface{}) {})
	case "add", "check", "del":
	default:
		return fmt.Errorf("unknown command %q", cmd)
	}
	rt := &libcni.RuntimeConf{ContainerID: o.containerID, NetNS: o.netns, IfName: o.ifname, CacheDir: o.cacheDir, Args: o.args}
	rt.CapabilityArgs = map[string]interface{}{}
	if o.portMappings != nil {
		rt.CapabilityArgs["portMappings"] = o.portMappings
	}
	if o.ips != nil {
		rt.CapabilityArgs["ips"] = o.ips
	}
	if list.version == v110 {
		return (&emulator{cni: cni, path: cniPath, list: list, rt: rt}).run(ctx, cmd)
	}
	conf, err := libcni.ConfListFromFile(o.conflist)
	if err != nil {
		return err
	}
	switch cmd {
	case "add":
		res, err := cni.AddNetworkList(ctx, conf, rt)
		if err != nil {
			return err
		}
		return printJSON(res)
	case "check":
		return cni.CheckNetworkList(ctx, conf, rt)
	default:
		return cni.DelNetworkList(ctx, conf, rt)
	}
}

func loadList(file string) (*rawList, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	l := &rawList{}
	if err := json.Unmarshal(data, &l.all); err != nil {
		return nil, fmt.Errorf("parsing %s: %w", file, err)
	}
	l.name, _ = l.all["name"].(string)
	l.version, _ = l.all["cniVersion"].(string)
	entries, _ := l.all["plugins"].([]interface{})
	for _, e := range entries {
		m, ok := e.(map[string]interface{})
		if !ok {
			return nil, fmt.Errorf("%s: plugin entry is not an object", file)
		}
		l.plugins = append(l.plugins, m)
	}
	return l, nil
}

// pluginConf builds one plugin's stdin like libcni's buildOneConfig.
func pluginConf(l *rawList, entry map[string]interface{}) map[string]interface{} {
	conf := make(map[string]interface{}, len(entry)+4)
	for k, v := range entry {
		conf[k] = v
	}
	conf["name"] = l.name
	conf["cniVersion"] = l.version
	return conf
}

func execPlugin(ctx context.Context, path []string, conf map[string]interface{}, env []string) ([]byte, error) {
	typ, _ := conf["type"].(string)
	bin, err := invoke.FindInPath(typ, path)
	if err != nil {
		return nil, err
	}
	stdin, err := json.Marshal(conf)
	if err != nil {
		return nil, err
	}
	return (&invoke.RawExec{Stderr: os.Stderr}).ExecPlugin(ctx, bin, stdin, env)
}

// invokeEach runs GC or STATUS on every bridge-nat entry, with only
// CNI_COMMAND and CNI_PATH set among the CNI_* variables (per the 1.1 spec).
func invokeEach(ctx context.Context, path []string, l *rawList, command string, extend func(map[string]interface{})) error {
	env := []string{"CNI_COMMAND=" + command, "CNI_PATH=" + strings.Join(path, ":")}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CNI_") {
			env = append(env, kv)
		}
	}
	for _, entry := range l.plugins {
		if entry["type"] != pluginType {
			continue
		}
		conf := pluginConf(l, entry)
		extend(conf)
		if _, err := execPlugin(ctx, path, conf, env); err != nil {
			return err
		}
	}
	return nil
}

// emulator runs a cniVersion 1.1.0 conflist: the leading non-bridge-nat
// plugins go through libcni at 1.0.0, the trailing bridge-nat entries are
// invoked directly at 1.1.0 with the chain's result as prevResult.
type emulator struct {
	cni  *libcni.CNIConfig
	path []string
	list *rawList
	rt   *libcni.RuntimeConf
	head *libcni.NetworkConfigList // nil when the list starts with bridge-nat
	tail []map[string]interface{}
}

func (e *emulator) run(ctx context.Context, cmd string) error {
	split := len(e.list.plugins)
	for i, p := range e.list.plugins {
		if p["type"] == pluginType && split == len(e.list.plugins) {
			split = i
		} else if p["type"] != pluginType && split < i {
			return fmt.Errorf("1.1.0 emulation needs the %s entries at the end of the plugin list", pluginType)
		}
	}
	e.tail = e.list.plugins[split:]
	if split > 0 {
		lower := make(map[string]interface{}, len(e.list.all))
		for k, v := range e.list.all {
			lower[k] = v
		}
		lower["cniVersion"] = v100
		plugins := make([]interface{}, split)
		for i := range plugins {
			plugins[i] = e.list.plugins[i]
		}
		lower["plugins"] = plugins
		data, err := json.Marshal(lower)
		if err != nil {
			return err
		}
		if e.head, err = libcni.ConfListFromBytes(data); err != nil {
			return err
		}
	}
	switch cmd {
	case "add":
		return e.add(ctx)
	case "check":
		return e.checkOrDel(ctx, "CHECK")
	default:
		return e.checkOrDel(ctx, "DEL")
	}
}

func (e *emulator) add(ctx context.Context) error {
	var prev map[string]interface{}
	if e.head != nil {
		res, err := e.cni.AddNetworkList(ctx, e.head, e.rt)
		if err != nil {
			return err
		}
		if prev, err = toMap(res); err != nil {
			return err
		}
	}
	for _, entry := range e.tail {
		out, err := e.invoke(ctx, "ADD", entry, prev)
		if err != nil {
			return err
		}
		prev = map[string]interface{}{}
		if err := json.Unmarshal(out, &prev); err != nil || prev == nil {
			return fmt.Errorf("%s ADD returned an invalid result %q: %v", pluginType, out, err)
		}
		if v, _ := prev["cniVersion"].(string); v == "" {
			prev["cniVersion"] = v110
		}
	}
	data, err := json.Marshal(prev)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(e.cacheFile()), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(e.cacheFile(), data, 0o600); err != nil {
		return err
	}
	return printJSON(prev)
}

// checkOrDel runs CHECK in list order and DEL in reverse order, each plugin
// getting the cached final result as prevResult (when there is one).
func (e *emulator) checkOrDel(ctx context.Context, command string) error {
	var cached map[string]interface{}
	if data, err := os.ReadFile(e.cacheFile()); err == nil {
		if err := json.Unmarshal(data, &cached); err != nil {
			return fmt.Errorf("corrupt cache %s: %w", e.cacheFile(), err)
		}
	}
	if command == "CHECK" && e.head != nil {
		if err := e.cni.CheckNetworkList(ctx, e.head, e.rt); err != nil {
			return err
		}
	}
	for i := range e.tail {
		entry := e.tail[i]
		if command == "DEL" {
			entry = e.tail[len(e.tail)-1-i]
		}
		if _, err := e.invoke(ctx, command, entry, cached); err != nil {
			return err
		}
	}
	if command == "DEL" {
		if e.head != nil {
			if err := e.cni.DelNetworkList(ctx, e.head, e.rt); err != nil {
				return err
			}
		}
		if err := os.Remove(e.cacheFile()); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	return nil
}

func (e *emulator) invoke(ctx context.Context, command string, entry, prev map[string]interface{}) ([]byte, error) {
	conf := pluginConf(e.list, entry)
	if prev != nil {
		relabelled := make(map[string]interface{}, len(prev))
		for k, v := range prev {
			relabelled[k] = v
		}
		relabelled["cniVersion"] = v110
		conf["prevResult"] = relabelled
	}
	// As libcni: each capability the entry declares and the runtime has args for.
	caps, _ := entry["capabilities"].(map[string]interface{})
	runtimeConfig := map[string]interface{}{}
	for name, on := range caps {
		if v, ok := e.rt.CapabilityArgs[name]; ok && on == true {
			runtimeConfig[name] = v
		}
	}
	if len(runtimeConfig) > 0 {
		conf["runtimeConfig"] = runtimeConfig
	}
	args := &invoke.Args{
		Command:     command,
		ContainerID: e.rt.ContainerID,
		NetNS:       e.rt.NetNS,
		IfName:      e.rt.IfName,
		PluginArgs:  e.rt.Args,
		Path:        strings.Join(e.path, ":"),
	}
	return execPlugin(ctx, e.path, conf, args.AsEnv())
}

func (e *emulator) cacheFile() string {
	dir := e.rt.CacheDir
	if dir == "" {
		dir = libcni.CacheDir
	}
	name := fmt.Sprintf("%s-%s-%s", e.list.name, e.rt.ContainerID, e.rt.IfName)
	return filepath.Join(dir, "bridge-nat-1.1.0", name)
}

func toMap(v interface{}) (map[string]interface{}, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	m := map[string]interface{}{}
	return m, json.Unmarshal(data, &m)
}

func printJSON(v interface{}) error {
	return json.NewEncoder(os.Stdout).Encode(v)
}
