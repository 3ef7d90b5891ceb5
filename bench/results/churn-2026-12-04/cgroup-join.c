#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <signal.h>
#include <time.h>
#include <sched.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <linux/sched.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e3+t.tv_nsec/1e6;}
static double wr(const char*dir,int pid){char p[256],b[32];snprintf(p,256,"%s/cgroup.procs",dir);int fd=open(p,O_WRONLY);if(fd<0){perror(p);exit(1);}int n=snprintf(b,32,"%d",pid);double t=now();if(write(fd,b,n)!=n){perror("write");exit(1);}double d=now()-t;close(fd);return d;}
int main(int argc,char**argv){
  int mode=atoi(argv[1]); int n=atoi(argv[2]); int gap=atoi(argv[3]);
  const char*base[4]={"/sys/fs/cgroup/unified/cgt","/sys/fs/cgroup/memory/cgt","/sys/fs/cgroup/pids/cgt","/sys/fs/cgroup/cpu/cgt"};
  for(int i=0;i<4;i++){mkdir(base[i],0755);}
  for(int k=0;k<n;k++){
    usleep(gap*1000);
    double d[5]={0};
    int pid;
    double t0=now();
    if(mode==1){ /* clone3 into v2 */
      int cfd=open(base[0],O_RDONLY|O_DIRECTORY);
      struct clone_args a; memset(&a,0,sizeof a); a.flags=CLONE_INTO_CGROUP; a.exit_signal=SIGCHLD; a.cgroup=cfd;
      pid=syscall(SYS_clone3,&a,sizeof a);
      if(pid==0){pause();_exit(0);} if(pid<0){perror("clone3");exit(1);}
      d[4]=now()-t0; close(cfd);
    } else { pid=fork(); if(pid==0){pause();_exit(0);} d[4]=now()-t0; }
    int order[4]={0,1,2,3}; if(mode==2){order[0]=1;order[1]=2;order[2]=3;order[3]=0;}
    for(int j=0;j<4;j++){int i=order[j]; if(mode==1&&i==0)continue; d[i]=wr(base[i],pid);}
    kill(pid,SIGKILL); waitpid(pid,0,0);
    printf("%d fork %.3f v2 %.3f mem %.3f pids %.3f cpu %.3f\n",k,d[4],d[0],d[1],d[2],d[3]);
  }
  for(int i=0;i<4;i++) rmdir(base[i]);
}
