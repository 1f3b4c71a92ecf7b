// Command etcd is upstream etcd (go.etcd.io/etcd/server/v3), built from Go
// modules for sombrero's integration tests. It lives in its own module
// because etcd's dependency versions conflict with k8s.io/kubernetes'.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
