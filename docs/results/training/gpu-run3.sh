set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
run() {  # name, flags...
  local name=$1; shift
  mkdir -p /tmp/$name && cp .gpu/mnist-work/* /tmp/$name/
  ( time timeout 240 python3 -m training.build_mnist --data-dir .gpu/data --device cuda --train-only \
      --work-dir /tmp/$name "$@" ) > /tmp/$name.log 2>&1
}
run paper --classifier-epochs 50 &
run glorot --classifier-epochs 50 --classifier-init glorot &
run step --classifier-epochs 50 --classifier-init glorot --classifier-schedule step &
run shift --classifier-epochs 50 --classifier-init glorot --classifier-schedule step --classifier-shift 2 &
wait
for n in paper glorot step shift; do
  echo "== $n"; grep "classifier epoch" /tmp/$n.log | sort -t' ' -k1 | awk '{print $11}' | sort -n | tail -1
  grep "classifier epoch" /tmp/$n.log | tail -2; grep real /tmp/$n.log
  rm /tmp/$n/ae_i* /tmp/$n/ae_ii*; cp /tmp/$n.log /tmp/$n/
done
tar czf $OUT/mnist-clf.tgz -C /tmp paper glorot step shift
