set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/w && cp .gpu/cifar10-work/* /tmp/w/
( time timeout 300 python3 -m training.build_cifar10 --data-dir .gpu/data --device cuda --train-only \
    --work-dir /tmp/w --classifier-epochs 60 ) > $OUT/cifar10-clf60.log 2>&1
tail -4 $OUT/cifar10-clf60.log
grep "classifier epoch" $OUT/cifar10-clf60.log | tail -3
tar czf $OUT/cifar10-clf60.tgz -C /tmp w
