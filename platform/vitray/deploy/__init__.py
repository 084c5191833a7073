"""vitray.deploy: running vitray on a cluster.

``ray_jobs`` submits runs to a Ray cluster's job server (``vitray submit``, ``vitray jobs``); ``values`` maps a run
config to the Helm chart's values and ``manifests`` renders the KubeRay objects from them (``vitray k8s render``);
``k8s`` creates and watches them through the Kubernetes API (``vitray k8s submit``). Nothing here imports torch.
"""
