{{/*
Names, labels and the RayCluster spec shared by the RayJob and the RayService.
platform/vitray/deploy/manifests.py renders the same objects from the same values (vitray k8s render|submit);
tests/test_chart.py requires both to agree. Change them together.
*/}}

{{- define "vitray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* At most 40 characters: KubeRay derives longer names (clusters, submitter Jobs) from a RayJob's. */}}
{{- define "vitray.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vitray.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; call with (dict "root" $ "component" "train"). */}}
{{- define "vitray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vitray.name" .root | quote }}
app.kubernetes.io/instance: {{ .root.Release.Name | quote }}
app.kubernetes.io/component: {{ .component | quote }}
{{- end }}

{{/* Standard labels; call with (dict "root" $ "component" "train"). */}}
{{- define "vitray.labels" -}}
{{ include "vitray.selectorLabels" . }}
app.kubernetes.io/part-of: vitray
helm.sh/chart: {{ include "vitray.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "vitray.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) }}
{{- end }}

{{- define "vitray.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s-mlflow:%v" (include "vitray.fullname" .) (int .Values.mlflow.port) }}
{{- else }}
{{- .Values.mlflow.externalUri }}
{{- end }}
{{- end }}

{{- define "vitray.claimName" -}}
{{- default (printf "%s-data" (include "vitray.fullname" .)) .Values.storage.existingClaim }}
{{- end }}

{{- define "vitray.submitterServiceAccount" -}}
{{- default (printf "%s-submitter" (include "vitray.fullname" .)) .Values.submitter.serviceAccount.name }}
{{- end }}

{{/* Environment of every Ray container. */}}
{{- define "vitray.rayEnv" -}}
{{- $uri := include "vitray.trackingUri" . }}
{{- if $uri }}
- name: MLFLOW_TRACKING_URI
  value: {{ $uri | quote }}
{{- end }}
{{- if .Values.storage.enabled }}
- name: VITRAY_HOME
  value: {{ .Values.storage.mountPath | quote }}
{{- end }}
{{- with .Values.objectStorage.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ toString $v | quote }}
{{- end }}
{{- end }}

{{- define "vitray.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The RayCluster spec: a RayJob's rayClusterSpec and a RayService's rayClusterConfig.
Call with (dict "root" $ "component" "train" "configMap" "name-or-empty").
*/}}
{{- define "vitray.rayClusterSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $labels := include "vitray.selectorLabels" (dict "root" $root "component" .component) }}
{{- $env := include "vitray.rayEnv" $root | trim }}
rayVersion: {{ $v.rayVersion | toString | quote }}
{{- if $v.autoscaling.enabled }}
enableInTreeAutoscaling: true
autoscalerOptions:
  idleTimeoutSeconds: {{ int $v.autoscaling.idleTimeoutSeconds }}
  resources:
    {{- toYaml $v.autoscaling.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
{{- end }}
{{- if eq $v.auth.mode "token" }}
authOptions:
  mode: token
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- range $k, $val := $v.head.rayStartParams }}
    {{- if ne $k "num-gpus" }}
    {{ $k }}: {{ toString $val | quote }}
    {{- end }}
    {{- end }}
    num-gpus: "0"
  template:
    metadata:
      labels:
        {{- $labels | nindent 8 }}
        ray.io/group: head
    spec:
      {{- include "vitray.podSecurity" $root | nindent 6 }}
      containers:
        - name: ray-head
          image: {{ include "vitray.image" $root | quote }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          ports:
            - {containerPort: 6379, name: gcs}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
            - {containerPort: 8000, name: serve}
          resources:
            {{- toYaml $v.head.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          {{- if $env }}
          env:
            {{- $env | nindent 12 }}
          {{- end }}
          {{- with $v.objectStorage.existingSecret }}
          envFrom:
            - secretRef: {name: {{ . | quote }}}
          {{- end }}
          volumeMounts:
            - {name: shm, mountPath: /dev/shm}
            {{- if $v.storage.enabled }}
            - {name: data, mountPath: {{ $v.storage.mountPath | quote }}}
            {{- end }}
            {{- if .configMap }}
            - {name: run-config, mountPath: /etc/vitray, readOnly: true}
            {{- end }}
      volumes:
        - {name: shm, emptyDir: {medium: Memory}}
        {{- if $v.storage.enabled }}
        - name: data
          persistentVolumeClaim:
            claimName: {{ include "vitray.claimName" $root | quote }}
        {{- end }}
        {{- if .configMap }}
        - name: run-config
          configMap:
            name: {{ .configMap }}
        {{- end }}
workerGroupSpecs:
  {{- range $g := $v.workerGroups }}
  - groupName: {{ $g.name | quote }}
    replicas: {{ int $g.replicas }}
    minReplicas: {{ int $g.minReplicas }}
    maxReplicas: {{ int $g.maxReplicas }}
    rayStartParams: {}
    template:
      metadata:
        labels:
          {{- $labels | nindent 10 }}
          ray.io/group: {{ $g.name | quote }}
      spec:
        {{- include "vitray.podSecurity" $root | nindent 8 }}
        {{- with $g.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $g.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ include "vitray.image" $root | quote }}
            imagePullPolicy: {{ $v.image.pullPolicy }}
            resources:
              requests:
                {{- toYaml $g.resources.requests | nindent 16 }}
              limits:
                {{- toYaml $g.resources.limits | nindent 16 }}
                {{- if gt (int $g.gpus) 0 }}
                nvidia.com/gpu: {{ int $g.gpus }}
                {{- end }}
            securityContext:
              {{- toYaml $v.securityContext | nindent 14 }}
            {{- if $env }}
            env:
              {{- $env | nindent 14 }}
            {{- end }}
            {{- with $v.objectStorage.existingSecret }}
            envFrom:
              - secretRef: {name: {{ . | quote }}}
            {{- end }}
            volumeMounts:
              - {name: shm, mountPath: /dev/shm}
              {{- if $v.storage.enabled }}
              - {name: data, mountPath: {{ $v.storage.mountPath | quote }}}
              {{- end }}
        volumes:
          - {name: shm, emptyDir: {medium: Memory}}
          {{- if $v.storage.enabled }}
          - name: data
            persistentVolumeClaim:
              claimName: {{ include "vitray.claimName" $root | quote }}
          {{- end }}
  {{- end }}
{{- end }}
