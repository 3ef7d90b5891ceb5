import sys,re,collections
out=sys.argv[1]
tids=set(open(out+'.tids0').read().split())|set(open(out+'.tids1').read().split())
lines=[l for l in open(out+'.strace') if l.split(' ',1)[0] in tids]
open(out+'.server','w').writelines(lines)
cnt=collections.Counter()
paths=collections.Counter()
for l in lines:
    m=re.match(r'(\d+) [\d:.]+ (\w+)\((.*)',l)
    if not m: continue
    sc=m.group(2); cnt[sc]+=1
    rest=m.group(3)
    if sc in('openat','statx','newfstatat','mkdir','rmdir','unlinkat','readlinkat','rename'):
        p=re.findall(r'"([^"]*)"',rest)
        key=sc+' '+(re.sub(r'[0-9a-f]{8}-[0-9a-f-]{27}','<ID>',re.sub(r'/proc/\d+','/proc/<pid>',p[0])) if p else '')
        key=re.sub(r'\d{3,}','<n>',key)
        paths[key]+=1
    elif sc in ('close','read','fcntl','pwrite64','pread64','write','connect','getdents64'):
        m2=re.match(r'(\d+)<([^>]*)>',rest)
        t=m2.group(2) if m2 else '?'
        t=re.sub(r'[0-9a-f]{8}-[0-9a-f-]{27}','<ID>',re.sub(r'/proc/\d+','/proc/<pid>',t)); t=re.sub(r'\d{3,}','<n>',t)
        if sc=='fcntl':
            f=rest.split(',')[1].strip() if ',' in rest else ''
            t+=' '+f
        paths[sc+' '+t]+=1
cyc=paths.get('rmdir '+sys.argv[2],0) if len(sys.argv)>2 else 0
print(cnt.most_common())
for k,v in paths.most_common(120): print(v,k)
